package device

import (
	"errors"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Sentinel errors of the device layer. NVML return codes become these in
// nvmlError and nowhere else, so callers test with errors.Is and never see a
// raw nvml.Return.
var (
	// ErrLibraryNotFound means libnvidia-ml could not be loaded: the machine
	// has no NVIDIA driver, so Discover offers CPU devices.
	ErrLibraryNotFound = errors.New("NVML library not found")
	// ErrDriverNotLoaded means the library exists but the kernel driver is not
	// running (a container with NVIDIA libraries on a host without a GPU).
	ErrDriverNotLoaded = errors.New("NVIDIA driver not loaded")
	// ErrNoPermission means the process may not query the GPU.
	ErrNoPermission = errors.New("no permission to query the GPU")
	// ErrGPULost means the GPU fell off the bus or stopped answering.
	ErrGPULost = errors.New("GPU is lost")
	// ErrResetRequired means the GPU must be reset before it can be used.
	ErrResetRequired = errors.New("GPU needs a reset")
	// ErrNotSupported means the GPU does not support the query; telemetry
	// queries that fail this way leave the field zero and are not errors.
	ErrNotSupported = errors.New("query not supported by the GPU")
	// ErrNVML is any other NVML failure; the wrapped nvml.Return names it.
	ErrNVML = errors.New("NVML error")
	// ErrNoGPU means NVML works but the machine has no GPU.
	ErrNoGPU = errors.New("no GPU found")
	// ErrUnknownGPU means a GPU selector (index or UUID) matches no GPU.
	ErrUnknownGPU = errors.New("unknown GPU")
	// ErrGPUUnavailable means GPUs were selected explicitly but NVML cannot
	// be used, so the executor refuses to start as a CPU node by surprise.
	ErrGPUUnavailable = errors.New("GPUs selected but NVML is unavailable")
	// ErrClosed means the backend was used after Close.
	ErrClosed = errors.New("device backend closed")
	// ErrBadProcFile means a /proc file could not be parsed.
	ErrBadProcFile = errors.New("unreadable /proc file")
)

// nvmlError decodes an NVML return code from operation op into an error that
// wraps both one of the sentinels above and the nvml.Return itself; SUCCESS
// is nil. This is the only place that interprets NVML return codes.
func nvmlError(op string, ret nvml.Return) error {
	var sentinel error
	switch ret {
	case nvml.SUCCESS:
		return nil
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		sentinel = ErrLibraryNotFound
	case nvml.ERROR_DRIVER_NOT_LOADED:
		sentinel = ErrDriverNotLoaded
	case nvml.ERROR_NO_PERMISSION:
		sentinel = ErrNoPermission
	case nvml.ERROR_GPU_IS_LOST:
		sentinel = ErrGPULost
	case nvml.ERROR_RESET_REQUIRED:
		sentinel = ErrResetRequired
	case nvml.ERROR_NOT_SUPPORTED:
		sentinel = ErrNotSupported
	default:
		sentinel = ErrNVML
	}
	return fmt.Errorf("nvml %s: %w (%w)", op, sentinel, ret)
}
