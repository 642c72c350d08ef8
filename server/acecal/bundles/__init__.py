"""acecal.bundles"""
