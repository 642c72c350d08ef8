"""acecal.client"""
