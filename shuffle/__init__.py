"""oncely.shuffle"""
