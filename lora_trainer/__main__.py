import gc
import sys

from .cli import main

rc = main()
gc.freeze()  # the process ends now: its final garbage collection need not walk torch & co. (gc_freeze.py)
sys.exit(rc)
