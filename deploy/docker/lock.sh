#!/usr/bin/env bash
# Refresh the image's pinned dependencies, with their hashes:
#   requirements.lock  what the exporter runs with (pyproject.toml's dependencies)
#   build.lock         what builds its wheel (hatchling)
# The image installs nothing else (deploy/docker/Dockerfile, --require-hashes), and
# tests/test_image.py fails when pyproject.toml asks for something the lock does not pin.
# Needs pip-tools: pip install pip-tools
set -euo pipefail
cd "$(dirname "$0")"
export CUSTOM_COMPILE_COMMAND="bash deploy/docker/lock.sh"
flags=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url
       --no-emit-find-links --upgrade)
pip-compile "${flags[@]}" --output-file requirements.lock ../../pyproject.toml
echo hatchling | pip-compile "${flags[@]}" --output-file build.lock -
