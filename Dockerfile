# jetmail: one static binary (gateway, deliverer, controller, serve, queue
# tools) on a distroless base with no shell, running as a non-root user.
#
#   docker build -t ghcr.io/jetmail/jetmail:dev .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... .
#
# The build stage runs on the build machine's platform and cross-compiles
# (CGO is off), so multi-platform builds need no emulation.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
WORKDIR /src
# Dependencies first: this layer stays cached while only the code changes.
COPY go.mod go.sum ./
# go-smtp with our patches (third_party/go-smtp/PATCHES.md), by a replace.
COPY third_party/ third_party/
RUN go mod download
COPY . .
ARG TARGETOS TARGETARCH
RUN CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags=-s -o /jetmail ./cmd/jetmail

FROM gcr.io/distroless/static:nonroot
COPY --from=build /jetmail /jetmail
# 65532:65532, the same IDs the Helm chart's securityContext uses.
USER nonroot:nonroot
# SMTP (gateway, serve) and /metrics, /healthz, /readyz. The deliverer uses
# 9091 and the controller 8080/8081 (see the Helm chart).
EXPOSE 2525 9090
ENTRYPOINT ["/jetmail"]
CMD ["--help"]
