// Command tessera-planner publishes fragment plans: configure, start, wait.
package main

import (
	"context"
	"log/slog"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/planner"
)

func main() {
	var cfg planner.Config
	svc.Main("planner", planner.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return planner.Run(ctx, cfg, planner.Deps{Bus: c, Log: log})
	})
}
