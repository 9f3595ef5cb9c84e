#!/usr/bin/perl
# Tree generator of the installer demo, shared by the guest (guest-build.sh)
# and the host (run.sh rebuilds the same tree to check the guest's squashfs).
#
# Usage: gen-tree.pl DIR FILES KB BIGEVERY BIGMB SEED JOBS WORKER
# Writes files i = WORKER, WORKER+JOBS, ... < FILES as DIR/dNNN/fNNNNN.bin
# (100 files per directory). File i has 1 byte to 2*KB KiB, except every
# BIGEVERY-th file which has BIGMB/2 to 1.5*BIGMB MiB. File i depends only on
# SEED and i, not on JOBS. Every worker derives the same two
# 1 MiB pools from SEED; a file is the XOR of two pool slices at offsets drawn
# from a per-file seed, so the content is reproducible (perl's rand is its own
# drand48 on every platform) and does not compress.
use strict;
use warnings;
my ($dir, $files, $kb, $bigevery, $bigmb, $seed, $jobs, $w) = @ARGV;
my $P = 1 << 20;
srand($seed);
my $p1 = pack("N*", map { int(rand(4294967296)) } 1 .. $P / 4);
my $p2 = pack("N*", map { int(rand(4294967296)) } 1 .. $P / 4);
$p1 .= $p1;
$p2 .= $p2;
for (my $i = $w; $i < $files; $i += $jobs) {
    srand($seed * 1000003 + $i);
    my $len = ($bigevery > 0 && $i % $bigevery == 0)
        ? int($bigmb * $P / 2) + int(rand($bigmb * $P))
        : 1 + int(rand(2 * $kb * 1024));
    my $d = sprintf("%s/d%03d", $dir, int($i / 100));
    mkdir($d) or $!{EEXIST} or die "mkdir $d: $!";
    my $f = sprintf("%s/f%05d.bin", $d, $i);
    open(my $fh, '>:raw', $f) or die "open $f: $!";
    while ($len > 0) {
        my $c = $len < $P ? $len : $P;
        my $x = int(rand($P));
        my $y = int(rand($P));
        my $buf = substr($p1, $x, $c) ^ substr($p2, $y, $c);
        my $off = 0;
        while ($off < $c) {
            my $n = syswrite($fh, $buf, $c - $off, $off);
            die "write $f: $!" unless defined $n;
            $off += $n;
        }
        $len -= $c;
    }
    close($fh) or die "close $f: $!";
}
