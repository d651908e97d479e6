#!/usr/bin/env bash
# Vendors the charting library of flowstat serve into ../assets/vendor from
# the exact versions package-lock.json pins (npm ci, no install scripts run).
# The output is committed, so `go build` needs no npm; rerun after changing
# package.json (`make webview-assets`).
set -euo pipefail
cd "$(dirname "$0")"
npm ci --ignore-scripts --no-audit --no-fund
out=../assets/vendor
mkdir -p "$out"
cp node_modules/uplot/dist/uPlot.iife.min.js node_modules/uplot/dist/uPlot.min.css "$out/"
cp node_modules/uplot/LICENSE "$out/uPlot.LICENSE"
echo "uplot $(node -p 'require("./node_modules/uplot/package.json").version')" >"$out/VERSIONS"
echo "webview assets: $(ls "$out" | tr '\n' ' ')"
