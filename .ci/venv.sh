# Sourced by the CI scripts that need Python tools: `ensure_venv VENV REQUIREMENTS` makes VENV
# hold exactly the pinned REQUIREMENTS (rebuilt only when the file changes). Returns 0 when it
# was up to date, 0 after installing, 1 when the machine cannot make venvs.
ensure_venv() {
  local venv="$1" reqs="$2" stamp="$1/.requirements.sha256" want
  want="$(sha256sum "$reqs" | cut -d' ' -f1)"
  if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  printf 'installing %s pinned packages from %s into %s\n' \
    "$(grep -cE '^[A-Za-z]' "$reqs")" "${reqs##*/}" "$venv"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    # Debian's system Python ships venv/ensurepip separately.
    if command -v apt-get >/dev/null && [[ $(id -u) -eq 0 ]]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      printf 'python3 venv support is missing (install python3-venv)\n'; return 1
    fi
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
  printf '%s\n' "$want" >"$stamp"
}
