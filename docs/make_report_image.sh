#!/bin/sh
# Makes docs/report-example.png, the README's picture of a report: a fresh quickstart run
# (a few minutes on a CPU), its `mamlpp report`, and a screenshot of the top of index.html
# in headless Chromium (Debian: apt-get install chromium), reduced to a 256-colour PNG.
# Run from the repository root with the venv active: sh docs/make_report_image.sh
set -eu
work=$(mktemp -d)
export MAMLPP_HOME="$work/home"
mamlpp run --no-tui --name docs-example
mamlpp report docs-example --out "$work/report"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chromium" --hide-scrollbars --window-size=1400,1340 \
    --screenshot="$work/page.png" "file://$work/report/index.html"
python - "$work/page.png" docs/report-example.png <<'PY'
import sys
from PIL import Image

page = Image.open(sys.argv[1]).convert("RGB")
page.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(sys.argv[2], optimize=True)
PY
rm -rf "$work"
ls -l docs/report-example.png
