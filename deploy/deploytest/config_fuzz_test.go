package deploytest

import (
	"context"
	"reflect"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/planner"
	"github.com/tessera-grid/tessera/services/registry"
	"github.com/tessera-grid/tessera/services/router"
	"github.com/tessera-grid/tessera/services/settlement"
)

// serviceConfigs makes a fresh Config of every service with its prefix.
var serviceConfigs = []func() (string, any){
	func() (string, any) { return registry.EnvPrefix, new(registry.Config) },
	func() (string, any) { return planner.EnvPrefix, new(planner.Config) },
	func() (string, any) { return router.EnvPrefix, new(router.Config) },
	func() (string, any) { return executor.EnvPrefix, new(executor.Config) },
	func() (string, any) { return settlement.EnvPrefix, new(settlement.Config) },
}

// envNames lists the variables a Config reads (without its prefix).
func envNames(cfg any) []string {
	var out []string
	t := reflect.TypeOf(cfg).Elem()
	for i := range t.NumField() {
		if key, _, _ := strings.Cut(t.Field(i).Tag.Get("env"), ","); key != "" {
			out = append(out, strings.TrimSpace(key))
		}
	}
	return out
}

// FuzzServiceEnvironment: a service's settings come from environment files
// (systemd, Kubernetes); any values of any two of its variables load, or
// fail with an error that names one of them.
func FuzzServiceEnvironment(f *testing.F) {
	f.Add(uint8(3), uint8(7), "8GiB", uint8(8), "2s")
	f.Add(uint8(2), uint8(1), "", uint8(2), "-5m")
	f.Add(uint8(2), uint8(10), "1e99", uint8(4), "0x10")
	f.Add(uint8(0), uint8(0), "three", uint8(1), "1µs")
	f.Fuzz(func(t *testing.T, svc, k1 uint8, v1 string, k2 uint8, v2 string) {
		prefix, cfg := serviceConfigs[int(svc)%len(serviceConfigs)]()
		names := envNames(cfg)
		if len(names) == 0 {
			return
		}
		a, b := prefix+names[int(k1)%len(names)], prefix+names[int(k2)%len(names)]
		err := config.LoadMap(context.Background(), prefix, cfg, map[string]string{a: v1, b: v2})
		if err != nil && !strings.Contains(err.Error(), a) && !strings.Contains(err.Error(), b) {
			t.Fatalf("setting %s=%q %s=%q: error names neither: %v", a, v1, b, v2, err)
		}
	})
}
