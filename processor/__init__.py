"""oncely.processor"""
