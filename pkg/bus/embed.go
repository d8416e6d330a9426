// Package bus connects services to the NATS system: it starts an embedded
// nats-server with JetStream where no external one is given, connects
// clients, creates (idempotently) every stream, bucket and object store the
// grid uses, and dead-letters messages that cannot be processed.
package bus

import (
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// EmbedOptions configures an embedded nats-server.
type EmbedOptions struct {
	// StoreDir is where JetStream keeps its data; it must be private to
	// this server instance.
	StoreDir string
	// Host and Port to listen on. Port 0 picks the default 4222; -1 picks a
	// free port (tests).
	Host string
	Port int
	// Name is the server name (shown in monitoring and cluster routes).
	Name string
	// MaxPayload caps a message's size in bytes (default 8 MiB: tensors of
	// large prompts travel as single messages).
	MaxPayload int32
}

// StartEmbedded starts a nats-server with JetStream in this process and
// waits until it accepts connections.
func StartEmbedded(o EmbedOptions) (*server.Server, error) {
	if o.StoreDir == "" {
		return nil, fmt.Errorf("embedded nats: StoreDir is required")
	}
	if err := os.MkdirAll(o.StoreDir, 0o750); err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.MaxPayload == 0 {
		o.MaxPayload = 8 << 20
	}
	opts := &server.Options{
		ServerName: o.Name,
		Host:       o.Host,
		Port:       o.Port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: o.MaxPayload,
		// JetStream memory and disk limits default to a share of the machine.
	}
	if opts.Port == 0 {
		opts.Port = server.DEFAULT_PORT
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready for connections after 10s")
	}
	return s, nil
}
