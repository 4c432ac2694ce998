# The chronflow operator image: a locked release build, then a small non-root runtime with only
# the binary. Build it with: docker build -t chronflow:0.1.0 .
#
# The build step below is exactly the one the end-to-end test runs (e2e/install.rs builds the
# release binary this way and runs it as the chart's ServiceAccount), so what ships is what is
# tested.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin chronflow

# glibc and libgcc only (no shell, no package manager); runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/chronflow /usr/local/bin/chronflow
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["chronflow", "run"]
