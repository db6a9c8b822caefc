#!/bin/sh
# Verify the mounted model bundles and weights, then run the command.
# A damaged or unrecorded file stops the container here, naming the file.
set -eu
if [ -n "${XREAL_MODELS_DIR:-}" ] && [ -n "$(find "$XREAL_MODELS_DIR" -mindepth 2 -maxdepth 2 -name model_index.json 2>/dev/null)" ]; then
    xreal verify --models-dir "$XREAL_MODELS_DIR"
else
    xreal verify  # the bundled demo model, and whatever is in the weight cache
fi
exec "$@"
