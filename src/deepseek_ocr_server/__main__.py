"""``python -m deepseek_ocr_server`` == ``deepseek-ocr-server``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
