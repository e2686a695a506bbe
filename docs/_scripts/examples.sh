#!/usr/bin/env bash
# Regenerates the example figures and printed outputs that the docs show, by running
# each example with its default settings. Run from anywhere; takes a few minutes on a
# CPU. The numbers depend on the machine (and its load): say which when you commit.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=docs/_static/examples
mkdir -p "$out"
for name in neural_ode neural_sde long_sequences stiff; do
    echo "== $name"
    # tqdm draws on stderr; stdout holds what the page shows.
    MPLBACKEND=Agg python "examples/$name.py" --out "$out/$name.png" | tee "$out/$name.txt"
done
