#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine: a venv with the package and its test
# extras, the CPU torch wheel, headless Chromium for the HTML report test, and the PostgreSQL and
# MariaDB servers (started if they are down). Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
# The CPU wheel lies on disk; never let a loose requirement pull a CUDA build.
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q 'torch==2.13.0'

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Headless Chromium + driver for the report's browser test.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# Database servers (the machine image installs them; start them if they are down).
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! mysqladmin -h 127.0.0.1 -uroot ping >/dev/null 2>&1; then
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
fi
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && mysqladmin -h 127.0.0.1 -uroot ping >/dev/null 2>&1 && break
  sleep 1
done
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -c 'CREATE DATABASE test' >/dev/null
mysql -h 127.0.0.1 -uroot -e 'CREATE DATABASE IF NOT EXISTS test' >/dev/null
# A one-node SLURM cluster for tests/slurm/ (they skip with the reason when it cannot start).
as_root bash scripts/slurm/local_cluster.sh \
  || echo "dev setup: the local SLURM cluster did not start; tests/slurm/ will be skipped." >&2
echo "dev setup done: $(.venv/bin/python -c 'import optuna, optuna_guard; print("optuna", optuna.__version__, "optuna_guard", optuna_guard.__version__)')"
