#!/usr/bin/env bash
# Stop the local Ray started by ray_start.sh (and every Ray process of this user).
ray stop --force >/dev/null 2>&1 || true
