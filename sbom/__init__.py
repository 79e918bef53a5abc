"""(component: see module docstrings)"""
