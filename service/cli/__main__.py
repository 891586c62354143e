"""``python -m service.cli``: the same as the ``pacs-xai`` command."""

import sys

from service.cli.main import main

sys.exit(main())
