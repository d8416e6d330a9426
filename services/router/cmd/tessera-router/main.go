// Command tessera-router serves the OpenAI-compatible API: configure, start, wait.
package main

import (
	"context"
	"log/slog"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/router"
)

func main() {
	var cfg router.Config
	svc.Main("router", router.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return router.Run(ctx, cfg, router.Deps{Bus: c, Log: log})
	})
}
