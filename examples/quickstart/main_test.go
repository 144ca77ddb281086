package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestQuickstartRuns builds and runs the program as `go run ./examples/quickstart` would: it
// exits 0 and tells the story of both orders.
func TestQuickstartRuns(t *testing.T) {
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "quickstart")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	cmd := exec.Command(bin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.Output()
	require.NoError(t, err, "the quickstart exits 0; stderr:\n%s", stderr.String())
	got := string(stdout)
	want := []string{
		`order of 2 items:`,
		`  /shop.Payments/Charge(20): balance 20, stock 3`,
		`  /shop.Stock/Reserve(2): balance 20, stock 1`,
		`  => error: <nil>`,
		`order of 5 items:`,
		`  /shop.Payments/Charge(50): balance 70, stock 1`,
		`  /shop.Payments/Refund(50): balance 20, stock 1`,
		`  => error: transaction "<gid>": step "reserve" aborted: rpc error: code = Aborted desc = Reserve(5): only 1 left: treaty participant: aborted: transaction rolled back`,
		`in the end: balance 20, stock 1`,
	}
	gid := regexp.MustCompile(`transaction "[^"]+"`)
	require.Equal(t, strings.Join(want, "\n")+"\n", gid.ReplaceAllString(got, `transaction "<gid>"`))
}

// TestQuickstartIsShort keeps the promise the README makes: at most 60 lines of Go, not
// counting blank lines and comments.
func TestQuickstartIsShort(t *testing.T) {
	t.Parallel()
	f, err := os.Open("main.go")
	require.NoError(t, err)
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "//") {
			n++
		}
	}
	require.NoError(t, sc.Err())
	require.LessOrEqual(t, n, 60, "main.go has %d lines of code", n)
}
