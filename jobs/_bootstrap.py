"""Make ``ray_ad`` importable when a job runs from an uploaded working dir without an install."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
