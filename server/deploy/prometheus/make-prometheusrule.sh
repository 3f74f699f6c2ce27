#!/usr/bin/env bash
# Writes warden-prometheusrule.yaml (the Prometheus Operator form) from
# warden-rules.yml: the same groups under `spec:`. Run after editing the
# rules; `bash tests/run` fails while the two differ.
set -euo pipefail
cd "$(dirname "$0")"
{
  cat <<'HEADER'
# Generated from warden-rules.yml by make-prometheusrule.sh: edit that file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: warden
  namespace: warden
  labels:
    app.kubernetes.io/name: warden
spec:
HEADER
  grep -v '^#' warden-rules.yml | sed 's/^/  /; s/^  $//'
} > warden-prometheusrule.yaml
