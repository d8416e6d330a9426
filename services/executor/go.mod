module github.com/tessera-grid/tessera/services/executor

go 1.26.8

require (
	github.com/NVIDIA/go-nvml v0.13.0-1
	github.com/nats-io/nkeys v0.4.17
)

require (
	github.com/google/uuid v1.6.0 // indirect
	golang.org/x/crypto v0.58.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
