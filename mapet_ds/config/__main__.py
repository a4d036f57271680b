"""python -m mapet_ds.config --reference > mapet_ds/docs/CONFIG.md"""

import sys

from mapet_ds.config.reference import config_reference

if sys.argv[1:] != ["--reference"]:
    sys.exit("usage: python -m mapet_ds.config --reference   (prints the config reference as markdown)")
sys.stdout.write(config_reference())
