// Command kpnode runs a kpnode registry node and talks to a running one.
//
//	kpnode run      start a node (flags or KPNODE_* environment variables)
//	kpnode keygen   make an Ed25519 device key (PKCS#8 PEM, mode 0600)
//	kpnode id       print the node's peer ID and bootstrap multiaddrs
//	kpnode publish  sign a KeyPackage file with a device key and post it
//	kpnode fetch    get a device's bundle (or an account bundle) and verify it
//	kpnode claim    claim a one-time KeyPackage of a device (or one per device of an account)
//	kpnode consume  sign a consume notice for used KeyPackages and post it
//	kpnode count    count a device's unclaimed KeyPackages
//	kpnode status   print a running node's status
//
// This file and its siblings only parse flags; the work is in node/.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
)

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"run", "start a node", runNode},
		{"keygen", "make an Ed25519 device key", runKeygen},
		{"id", "print the node's peer ID and the multiaddrs others pass to --bootstrap", runID},
		{"publish", "sign a KeyPackage with a device key and post it to a node", runPublish},
		{"fetch", "get and verify a device's bundle or an account bundle", runFetch},
		{"claim", "claim a one-time KeyPackage of a device, or one per device of an account", runClaim},
		{"consume", "sign a consume notice for used KeyPackages (by ref) and post it", runConsume},
		{"count", "count a device's unclaimed one-time and its last-resort KeyPackages", runCount},
		{"status", "print a running node's status", runStatus},
		{"version", "print the version", func(_ []string, stdout, _ io.Writer) error {
			fmt.Fprintln(stdout, version())
			return nil
		}},
	}
}

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func realMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(args[1:], stdout, stderr)
			switch {
			case err == nil:
				return 0
			case errors.Is(err, flag.ErrHelp):
				return 0
			case errors.Is(err, errUsage):
				return 2
			default:
				fmt.Fprintf(stderr, "kpnode %s: %v\n", c.name, err)
				return 1
			}
		}
	}
	fmt.Fprintf(stderr, "kpnode: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "kpnode: a peer-to-peer registry node for MLS KeyPackages.\n\nUsage: kpnode <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'kpnode <command> -h' for a command's flags. Every flag of 'run' can also be\nset as KPNODE_<FLAG> in the environment (e.g. KPNODE_DATA, KPNODE_MAX_PER_DEVICE).")
}

// errUsage marks an error already reported by the flag package.
var errUsage = errors.New("usage")

// parseFlags applies KPNODE_* environment variables to fs, then the command
// line, which wins. It returns the positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		name := envName(f.Name)
		v, ok := os.LookupEnv(name)
		if !ok || envErr != nil {
			return
		}
		if err := fs.Set(f.Name, v); err != nil {
			envErr = fmt.Errorf("%s=%q: %w", name, v, err)
		}
	})
	if envErr != nil {
		fmt.Fprintln(fs.Output(), envErr)
		return nil, errUsage
	}
	fs.VisitAll(func(f *flag.Flag) {
		if r, ok := f.Value.(interface{ resetExplicit() }); ok {
			r.resetExplicit()
		}
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, errUsage
	}
	return fs.Args(), nil
}

func envName(flagName string) string {
	return "KPNODE_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func newFlagSet(name, args string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: kpnode %s [flags] %s\n\nFlags (each also as KPNODE_<FLAG>):\n", name, args)
		fs.PrintDefaults()
	}
	return fs
}

func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// parseInterspersed is parseFlags for commands whose flags may also follow
// their positional arguments (`kpnode claim DEVICE_ID --cipher-suite 1`).
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	rest, err := parseFlags(fs, args)
	if err != nil {
		return nil, err
	}
	var positional []string
	for len(rest) > 0 {
		positional = append(positional, rest[0])
		if err := fs.Parse(rest[1:]); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, errUsage
		}
		rest = fs.Args()
	}
	return positional, nil
}
