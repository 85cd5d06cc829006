"""The training job that runs on the instance (and locally with `lt train --local`)."""
