// Command tessera-registry tracks the grid's nodes: configure, start, wait.
package main

import (
	"context"
	"log/slog"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/registry"
)

func main() {
	var cfg registry.Config
	svc.Main("registry", registry.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return registry.Run(ctx, cfg, registry.Deps{Bus: c, Log: log})
	})
}
