"""``python -m pipeline.pages [--check] [--root DIR]``: write the generated pages, or check them."""

import sys

from pipeline.pages.build import main

sys.exit(main())
