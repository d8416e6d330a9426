// Command tessera-executor runs one supplier node: configure, start, wait.
package main

import (
	"context"
	"log/slog"

	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/executor"
)

func main() {
	var cfg executor.Config
	svc.Main("executor", executor.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
		return executor.Run(ctx, cfg, executor.Deps{Bus: c, Log: log})
	})
}
