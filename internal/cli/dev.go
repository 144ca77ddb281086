package cli

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/store/sqlite"
)

type devConfig struct {
	listen, httpListen, dbFile, kafka, logFormat, logLevel string
	adminTokensFile                                        string
	memory, adminOpen                                      bool
	allowFaults                                            bool
	kafkaPartitions                                        int
}

// dev runs a whole Treaty on one machine with nothing installed: the coordinator on the
// embedded SQLite store and an embedded Kafka-protocol broker for outbox traffic.
func dev(ctx context.Context, args []string, env Env) error {
	var c devConfig
	f := newFlags("dev", "coordinator dev: a single-process, single-node Treaty for development, needing nothing\n"+
		"installed: the coordinator on an embedded SQLite store, plus an embedded Kafka-protocol broker\n"+
		"(franz-go's kfake) for outbox traffic. Not for production: one node, no authentication.", env.Stderr, env.Stdout)
	f.String(&c.listen, "listen", ":7600", "gRPC listen address")
	f.String(&c.httpListen, "http-listen", ":7601", "address of /metrics, /healthz, /readyz, the admin API (/admin/v1) and the dashboard (/ui) (empty: off)")
	f.String(&c.adminTokensFile, "admin-tokens-file", "", adminTokensUsage)
	f.Bool(&c.adminOpen, "admin-open", false, "serve the admin API and dashboard without tokens, everyone an operator (anyone who\n      reaches --http-listen can then roll back transactions; dev mode only)")
	f.Bool(&c.allowFaults, "allow-fault-injection", false, allowFaultsUsage)
	f.String(&c.dbFile, "db-file", "treaty-dev.db", "SQLite file holding the coordinator's state")
	f.Bool(&c.memory, "memory", false, "keep state in memory only (lost on exit) instead of --db-file")
	f.String(&c.kafka, "kafka-listen", "127.0.0.1:9092", "address of the embedded Kafka-protocol broker (empty: no broker)")
	f.Int(&c.kafkaPartitions, "kafka-partitions", 3, "partitions of topics the embedded broker creates on first use")
	f.String(&c.logFormat, "log-format", "text", "log format: text or json")
	f.String(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := f.parse(args, env.Getenv); err != nil {
		return err
	}
	log, err := newLogger(env.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	tokens, err := adminTokens(c.adminTokensFile, env, log)
	if err != nil {
		return err
	}
	dsn := c.dbFile
	if c.memory {
		dsn = sqlite.Memory
	}
	st, err := sqlite.Open(ctx, dsn)
	if err != nil {
		return err
	}
	if _, err := st.Migrate(ctx); err != nil {
		st.Close()
		return err
	}
	var broker *kfake.Cluster
	if c.kafka != "" {
		host, portStr, err := net.SplitHostPort(c.kafka)
		if err != nil {
			st.Close()
			return fmt.Errorf("--kafka-listen %q: want host:port: %w", c.kafka, err)
		}
		port, err := strconv.Atoi(portStr)
		if err != nil {
			st.Close()
			return fmt.Errorf("--kafka-listen %q: port must be a number", c.kafka)
		}
		broker, err = kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.AllowAutoTopicCreation(),
			kfake.DefaultNumPartitions(c.kafkaPartitions),
			kfake.ListenFn(func(network, _ string) (net.Listener, error) {
				return net.Listen(network, net.JoinHostPort(host, portStr))
			}))
		if err != nil {
			st.Close()
			return fmt.Errorf("start the embedded Kafka broker on %s: %w", c.kafka, err)
		}
		defer broker.Close()
	}
	a, err := app.Start(ctx, app.Config{Store: st, Listen: c.listen, HTTPListen: c.httpListen, Logger: log,
		AdminTokens: tokens, AdminOpen: c.adminOpen, AllowFaultInjection: c.allowFaults,
		Engine: engine.Config{Lease: 5 * time.Second, RecoveryInterval: 500 * time.Millisecond}})
	if err != nil {
		st.Close()
		return err
	}
	where := dsn
	if c.memory {
		where = "memory (lost on exit)"
	}
	fmt.Fprintf(env.Stdout, `Treaty dev mode: single process, single node, no authentication. Not for production.
  gRPC API        %s   (grpcurl -plaintext %s list)
  HTTP            %s   (/metrics, /healthz, /readyz)
  state           SQLite %s
`, a.Addr, a.Addr, orNone(a.HTTPAddr), where)
	if a.HTTPAddr != "" {
		access := "bearer token required (" + strconv.Itoa(len(tokens)) + " configured)"
		switch {
		case c.adminOpen:
			access = "OPEN: no token needed, anyone who reaches it is an operator (--admin-open)"
		case len(tokens) == 0:
			access = "no tokens configured: refuses every request (set TREATY_ADMIN_TOKENS or --admin-open)"
		}
		fmt.Fprintf(env.Stdout, "  Dashboard       http://%s/ui/   admin API: %s\n", a.HTTPAddr, access)
	}
	if broker != nil {
		fmt.Fprintf(env.Stdout, "  Kafka broker    %s   (embedded kfake; topics are created on first use)\n", broker.ListenAddrs()[0])
	}
	fmt.Fprintln(env.Stdout, "Press Ctrl-C to stop.")
	if env.Ready != nil {
		env.Ready(a.Addr)
	}
	select {
	case <-ctx.Done():
	case err := <-a.Served():
		log.Error("gRPC server stopped", "err", err)
	}
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	return a.Stop(stopCtx)
}

func orNone(s string) string {
	if s == "" {
		return "(off)"
	}
	return s
}
