"""``python -m otel_flashinfer`` is the ``otel-flashinfer`` command."""

import sys

from .cli import main

sys.exit(main())
