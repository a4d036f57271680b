#!/usr/bin/env python
"""The embedded demo: make data, fit the tokenizer, pre-train MaPeT, fine-tune, evaluate.

    python launch/demo.py            # full demo, a few minutes on 2 CPU cores
    python launch/demo.py --small    # CI size
"""

import sys

from mapet_ds.demo import main

if __name__ == "__main__":
    sys.exit(main())
