#!/usr/bin/env python
"""The embedded demo: make data, fit the tokenizer, pre-train MaPeT, fine-tune, evaluate.

    python launch/demo.py            # full demo, a few minutes on 2 CPU cores
    python launch/demo.py --small    # CI size
"""

import os
import sys

# launch/ holds tokenize.py, which would shadow the standard library's `tokenize`:
# replace the script directory on the import path by the repository root.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

from mapet_ds.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
