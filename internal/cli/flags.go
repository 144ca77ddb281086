package cli

import (
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// flags is a flag.FlagSet where every flag also reads a TREATY_* environment variable. The
// command line wins over the environment, which wins over the default.
type flags struct {
	fs     *flag.FlagSet
	env    map[string]string // flag name -> env var
	name   string
	doc    string
	stdout io.Writer
}

func newFlags(name, doc string, out, stdout io.Writer) *flags {
	f := &flags{fs: flag.NewFlagSet(name, flag.ContinueOnError), env: map[string]string{}, name: name, doc: doc, stdout: stdout}
	f.fs.SetOutput(out)
	f.fs.Usage = f.usage
	return f
}

func envName(flagName string) string {
	return "TREATY_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func (f *flags) String(p *string, name, def, usage string) {
	f.fs.StringVar(p, name, def, usage)
	f.env[name] = envName(name)
}

func (f *flags) Int(p *int, name string, def int, usage string) {
	f.fs.IntVar(p, name, def, usage)
	f.env[name] = envName(name)
}

func (f *flags) Duration(p *time.Duration, name string, def time.Duration, usage string) {
	f.fs.DurationVar(p, name, def, usage)
	f.env[name] = envName(name)
}

func (f *flags) Bool(p *bool, name string, def bool, usage string) {
	f.fs.BoolVar(p, name, def, usage)
	f.env[name] = envName(name)
}

// parse reads the command line, then fills every flag not given there from its environment
// variable.
func (f *flags) parse(args []string, getenv func(string) string) error {
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" || a == "--h" {
			// Asked for help: it goes to stdout so that `coordinator serve --help | less` works.
			f.fs.SetOutput(f.stdout)
		}
	}
	if err := f.fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	f.fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	for name, env := range f.env {
		if set[name] {
			continue
		}
		if v := getenv(env); v != "" {
			if err := f.fs.Set(name, v); err != nil {
				return fmt.Errorf("%s=%q: %w (want %s, as for --%s)", env, v, err, kindOf(f.fs.Lookup(name)), name)
			}
		}
	}
	if f.fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags start with --)", f.fs.Arg(0))
	}
	return nil
}

func (f *flags) usage() {
	w := f.fs.Output()
	fmt.Fprintf(w, "%s\n\nFlags (each also read from the environment variable shown):\n", f.doc)
	var names []string
	f.fs.VisitAll(func(fl *flag.Flag) { names = append(names, fl.Name) })
	sort.Strings(names)
	for _, n := range names {
		fl := f.fs.Lookup(n)
		def := ""
		if fl.DefValue != "" && fl.DefValue != "false" && fl.DefValue != "0" {
			def = fmt.Sprintf(" (default %s)", fl.DefValue)
		}
		fmt.Fprintf(w, "  --%s  [%s]%s\n      %s\n", n, f.env[n], def, fl.Usage)
	}
}

func getenvOS(k string) string { return os.Getenv(k) }

// kindOf describes what a flag's value looks like, for error messages.
func kindOf(fl *flag.Flag) string {
	switch fl.Value.(flag.Getter).Get().(type) {
	case time.Duration:
		return "a duration such as 10s or 1m30s"
	case int, int64, uint, uint64:
		return "an integer"
	case float64:
		return "a number such as 50 or 0.5"
	case bool:
		return "true or false"
	}
	return "a string"
}

func (f *flags) Float64(p *float64, name string, def float64, usage string) {
	f.fs.Float64Var(p, name, def, usage)
	f.env[name] = envName(name)
}

func (f *flags) Int64(p *int64, name string, def int64, usage string) {
	f.fs.Int64Var(p, name, def, usage)
	f.env[name] = envName(name)
}
