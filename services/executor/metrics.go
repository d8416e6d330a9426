package executor

import (
	"context"
	"strconv"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// registerDeviceGauges observes the utilization and memory of the node's
// devices (GPUs through NVML, or CPU devices) as last snapshot returns them,
// until the returned function is called.
func registerDeviceGauges(node string, snapshot func() []wire.Device) (func(), error) {
	meter := otel.Meter("tessera/executor")
	util, err := meter.Float64ObservableGauge("tessera.executor.device.utilization",
		metric.WithUnit("%"), metric.WithDescription("compute utilization of each device (GPU or CPU)"))
	if err != nil {
		return nil, err
	}
	used, err := meter.Int64ObservableGauge("tessera.executor.device.memory.used",
		metric.WithUnit("By"), metric.WithDescription("memory in use on each device"))
	if err != nil {
		return nil, err
	}
	total, err := meter.Int64ObservableGauge("tessera.executor.device.memory.total",
		metric.WithUnit("By"), metric.WithDescription("memory of each device"))
	if err != nil {
		return nil, err
	}
	reg, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		for _, d := range snapshot() {
			if d.Error != "" {
				continue
			}
			attrs := metric.WithAttributes(attribute.String("node", node), attribute.String("device", strconv.Itoa(d.Index)),
				attribute.String("kind", d.Kind), attribute.String("uuid", d.UUID))
			o.ObserveFloat64(util, d.Utilization, attrs)
			o.ObserveInt64(used, int64(d.MemoryTotal-min(d.MemoryFree, d.MemoryTotal)), attrs)
			o.ObserveInt64(total, int64(d.MemoryTotal), attrs)
		}
		return nil
	}, util, used, total)
	if err != nil {
		return nil, err
	}
	return func() { _ = reg.Unregister() }, nil
}
