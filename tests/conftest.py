import os
import sys

# The project is a flat set of scripts and modules at the repository root, not an installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
