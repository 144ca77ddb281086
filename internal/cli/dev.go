package cli

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/store/sqlite"
)

type devConfig struct {
	listen, httpListen, dbFile, kafka, logFormat, logLevel string
	db                                                     string // --db; dbFile is its old name
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
		"(franz-go's kfake) for outbox traffic. Not for production: one node, no authentication of\n"+
		"gRPC calls. It listens on 127.0.0.1 only, and there the admin API and dashboard need no token;\n"+
		"another address must be asked for (--listen, --http-listen) and is warned about.", env.Stderr, env.Stdout)
	f.String(&c.listen, "listen", "127.0.0.1:7600", "gRPC listen address (another host than loopback: reachable, unauthenticated, by others)")
	f.String(&c.httpListen, "http-listen", "127.0.0.1:7601", "address of /metrics, /healthz, /readyz, the admin API (/admin/v1) and the dashboard (/ui) (empty: off).\n"+
		"      On a loopback address and without admin tokens, the admin API and dashboard need no token")
	f.String(&c.adminTokensFile, "admin-tokens-file", "", adminTokensUsage)
	f.Bool(&c.adminOpen, "admin-open", false, "serve the admin API and dashboard without tokens, everyone an operator, on any --http-listen\n"+
		"      address (anyone who reaches it can then roll back transactions; dev mode only). On loopback this is the default")
	f.Bool(&c.allowFaults, "allow-fault-injection", false, allowFaultsUsage)
	f.String(&c.db, "db", "", "SQLite file holding the coordinator's state (default: treaty/dev.db in the user's cache directory,\n"+
		"      e.g. ~/.cache/treaty/dev.db; created if missing)")
	// Not TREATY_DB: serve reads that one as a PostgreSQL URL.
	f.env["db"] = "TREATY_DEV_DB"
	f.String(&c.dbFile, "db-file", "", "old name of --db")
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
	// Loopback and no tokens: only this machine reaches the admin API, so it needs none.
	loopbackOpen := len(tokens) == 0 && !c.adminOpen && c.httpListen != "" && isLoopback(c.httpListen)
	dsn, err := devDBPath(c, env)
	if err != nil {
		return err
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
		AdminTokens: tokens, AdminOpen: c.adminOpen || loopbackOpen, AllowFaultInjection: c.allowFaults,
		Engine: engine.Config{Lease: 5 * time.Second, RecoveryInterval: 500 * time.Millisecond}})
	if err != nil {
		st.Close()
		return err
	}
	where := dsn
	if c.memory {
		where = "memory (lost on exit)"
	}
	fmt.Fprintf(env.Stdout, `Treaty dev mode: single process, single node, no authentication of gRPC calls. Not for production.
  gRPC API        %s   (grpcurl -plaintext %s list)
  HTTP            %s   (/metrics, /healthz, /readyz)
  state           SQLite %s
`, a.Addr, a.Addr, orNone(a.HTTPAddr), where)
	if a.HTTPAddr != "" {
		access := "bearer token required (" + strconv.Itoa(len(tokens)) + " configured)"
		switch {
		case c.adminOpen:
			access = "OPEN: no token needed, anyone who reaches it is an operator (--admin-open)"
		case loopbackOpen:
			access = "no token needed on loopback (only this machine reaches it; set TREATY_ADMIN_TOKENS to require one)"
		case len(tokens) == 0:
			access = "no tokens configured: refuses every request (set TREATY_ADMIN_TOKENS or --admin-open)"
		}
		fmt.Fprintf(env.Stdout, "  Dashboard       http://%s/ui/   admin API: %s\n", a.HTTPAddr, access)
	}
	if broker != nil {
		fmt.Fprintf(env.Stdout, "  Kafka broker    %s   (embedded kfake; topics are created on first use)\n", broker.ListenAddrs()[0])
	}
	for _, l := range []struct{ flag, addr string }{{"--listen", c.listen}, {"--http-listen", c.httpListen}} {
		if l.addr != "" && !isLoopback(l.addr) {
			fmt.Fprintf(env.Stdout, "WARNING: %s %s is reachable from other machines, and nothing on it is authenticated"+
				" in dev mode (gRPC calls never are; the admin API only with tokens).\n", l.flag, l.addr)
			log.Warn("dev mode listens beyond loopback without authentication", "flag", l.flag, "addr", l.addr)
		}
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

// isLoopback reports whether a listen address (host:port) binds to loopback only: 127.0.0.0/8,
// ::1 or localhost. An empty host (":7600") binds every interface.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// devDBPath is where dev keeps its state: memory, --db (or its old name --db-file), or
// treaty/dev.db in the user's cache directory, so that following the README writes nothing
// into the working tree.
func devDBPath(c devConfig, env Env) (string, error) {
	switch {
	case c.memory:
		return sqlite.Memory, nil
	case c.db != "":
		return c.db, nil
	case c.dbFile != "":
		return c.dbFile, nil
	}
	dir, err := userCacheDir(env)
	if err != nil {
		return "", fmt.Errorf("no user cache directory for the dev database (%w); pass --db FILE or --memory", err)
	}
	dir = filepath.Join(dir, "treaty")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create %s for the dev database: %w; pass --db FILE or --memory", dir, err)
	}
	return filepath.Join(dir, "dev.db"), nil
}

// userCacheDir is os.UserCacheDir, except that XDG_CACHE_HOME is read through env (tests point
// it elsewhere).
func userCacheDir(env Env) (string, error) {
	if d := env.Getenv("XDG_CACHE_HOME"); d != "" && filepath.IsAbs(d) {
		return d, nil
	}
	return os.UserCacheDir()
}
