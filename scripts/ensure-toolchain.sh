# Sourced by .ci/run (and usable by hand): makes sure the toolchain that rust-toolchain.toml pins
# is installed, with rustfmt and clippy, before the first cargo command.
# rustup installs it where it can download. A machine that cannot download, but whose "stable"
# toolchain is that very release, gets it made available under the pinned name instead.
if command -v rustup >/dev/null 2>&1; then
    pinned="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
    if ! rustup toolchain list | grep -q "^$pinned-"; then
        if [[ "$(rustup run stable rustc --version 2>/dev/null)" == "rustc $pinned "* ]]; then
            host="$(rustup run stable rustc -vV | sed -n 's/^host: //p')"
            echo "kabar: using the installed stable toolchain as $pinned-$host" >&2
            # rustup refuses `toolchain link` under an official name: link the directory.
            ln -s "$(rustup run stable rustc --print sysroot)" \
                "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$pinned-$host"
        else
            rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy
        fi
    fi
fi
