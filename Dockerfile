# stdio-sse in a FROM scratch image: the static binary and nothing else.
#
#   docker build -t stdio-sse .
#   docker run --rm -p 127.0.0.1:8000:8000 stdio-sse          # the built-in demo server
#
# To wrap a real server, the image needs its runtime: see contrib/Dockerfile.node and
# contrib/Dockerfile.python, which layer this binary onto node and python images.

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock main.rs ./
# The same static, non-PIE build as ./build.sh.
RUN RUSTFLAGS="-C relocation-model=static -C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/stdio-sse /stdio-sse

FROM scratch
COPY --from=build /stdio-sse /stdio-sse
# Inside a container the port is published by the engine: listen on every address.
# With no token set, stdio-sse warns about it at start (set STDIO_SSE_AUTH_TOKEN).
ENV STDIO_SSE_HOST=0.0.0.0
EXPOSE 8000
# Any uid works: there is no /etc/passwd to consult.
USER 65534:65534
# The image has no shell or curl: the binary checks itself (GET /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["/stdio-sse", "--probe"]
# PID 1 is stdio-sse itself: it reaps orphans and forwards signals (no --init needed).
ENTRYPOINT ["/stdio-sse"]
