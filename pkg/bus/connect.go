package bus

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/pkg/config"
)

// Conn is a service's connection to the NATS system with its JetStream context.
type Conn struct {
	NC *nats.Conn
	JS jetstream.JetStream
}

// Close drains the connection: pending replies and published messages are
// flushed before it closes.
func (c *Conn) Close() {
	if c == nil || c.NC == nil {
		return
	}
	if err := c.NC.Drain(); err != nil {
		c.NC.Close()
		return
	}
	// Drain is asynchronous; wait for it so that a caller's exit loses nothing.
	for i := 0; i < 200 && !c.NC.IsClosed(); i++ {
		time.Sleep(10 * time.Millisecond)
	}
}

// Connect connects to the NATS system described by cfg. When cfg.URL is
// empty, embedded must be a running in-process server, which the client then
// reaches without a socket. name identifies the client in monitoring.
func Connect(ctx context.Context, cfg config.NATS, embedded *server.Server, name string, extra ...nats.Option) (*Conn, error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				slog.Warn("nats disconnected", "client", name, "err", err)
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			slog.Debug("nats async error", "client", name, "subject", subject, "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			slog.Info("nats reconnected", "client", name, "url", nc.ConnectedUrlRedacted())
		}),
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.NKeySeed != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NKeySeed)
		if err != nil {
			return nil, fmt.Errorf("nats nkey seed %s: %w", cfg.NKeySeed, err)
		}
		opts = append(opts, o)
	}
	if cfg.User != "" {
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	}
	if cfg.InboxPrefix != "" {
		if strings.ContainsAny(cfg.InboxPrefix, "*> \t") || strings.HasSuffix(cfg.InboxPrefix, ".") {
			return nil, fmt.Errorf("NATS_INBOX_PREFIX %q: want subject tokens without wildcards, spaces or a trailing '.'", cfg.InboxPrefix)
		}
		opts = append(opts, nats.CustomInboxPrefix(cfg.InboxPrefix))
	}
	opts = append(opts, extra...)
	url := cfg.URL
	if url == "" {
		if embedded == nil {
			return nil, fmt.Errorf("connect %s: NATS_URL is empty and no embedded server runs", name)
		}
		opts = append(opts, nats.InProcessServer(embedded))
		url = embedded.ClientURL()
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect %s to %s: %w", name, url, err)
	}
	var js jetstream.JetStream
	if cfg.JSDomain != "" {
		js, err = jetstream.NewWithDomain(nc, cfg.JSDomain)
	} else {
		js, err = jetstream.New(nc)
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("jetstream for %s: %w", name, err)
	}
	return &Conn{NC: nc, JS: js}, nil
}
