"""oncely.ingest"""
