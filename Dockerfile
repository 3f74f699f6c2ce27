# The warden server in a container: a release build, then a slim runtime
# image holding only the binary. Not built by `bash tests/run` (its machine
# has no container runtime); the binary inside is the one the tests run.
#
#   docker build -t warden .
#   docker run --rm -p 50051:50051 -v "$PWD/warden-dev:/var/lib/warden-dev" warden \
#       serve --dev --dev-dir /var/lib/warden-dev --listen 0.0.0.0:50051
FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p warden-server --bin warden

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/warden --create-home warden
COPY --from=build /src/target/release/warden /usr/local/bin/warden
USER warden
WORKDIR /var/lib/warden
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/warden"]
CMD ["serve", "--config", "/etc/warden/warden.toml"]
