"""``python -m deepseek_ocr_server.batch``: the ``deepseek-ocr`` batch command."""

import sys

from .cli import main

sys.exit(main())
