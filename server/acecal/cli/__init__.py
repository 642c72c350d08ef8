"""acecal.cli"""
