"""oncely.egress"""
