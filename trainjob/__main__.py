"""`python -m trainjob --config job.json [--resume]` is the training job (trainjob.train)."""

import sys

from trainjob.train import main

sys.exit(main())
