"""oncely.schemas"""
