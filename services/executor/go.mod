module github.com/tessera-grid/tessera/services/executor

go 1.26.8

require github.com/NVIDIA/go-nvml v0.13.0-1

require github.com/google/uuid v1.6.0 // indirect
