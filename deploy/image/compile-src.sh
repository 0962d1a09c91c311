#!/usr/bin/env bash
# docker.setup_script of both bentofiles: runs in the image build after the Bento's files are
# copied in. Compiles the service's own modules (the venv's are compiled by uv), so a pod with
# a read-only root does not compile them again in the arbiter and the worker at every start.
set -euo pipefail
python -m compileall -q "${BENTO_PATH:?}/src"
