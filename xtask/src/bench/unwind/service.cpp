// cargo xtask bench unwind: a process that maps libstdc++ and glibc.
//
// Built with g++ -O2. Formats, sorts and joins strings in a loop, so the
// samples land in libstdc++ (std::string, std::sort's comparisons, the
// streams) and libc (memcpy, malloc), and prints one line every ~second
// (to /dev/null) so iostream is really used.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

__attribute__((noinline)) static std::vector<std::string> make_words(std::uint64_t seed) {
    std::vector<std::string> words;
    words.reserve(2000);
    for (int i = 0; i < 2000; i++) {
        seed = seed * 6364136223846793005u + 1442695040888963407u;
        words.push_back("w" + std::to_string(seed >> 40));
    }
    return words;
}

__attribute__((noinline)) static std::string join(const std::vector<std::string> &words) {
    std::ostringstream out;
    for (const auto &w : words)
        out << w << ' ';
    return out.str();
}

int main() {
    std::uint64_t seed = 1, total = 0;
    auto last = std::chrono::steady_clock::now();
    for (;;) {
        auto words = make_words(seed++);
        std::sort(words.begin(), words.end());
        total += join(words).size();
        auto now = std::chrono::steady_clock::now();
        if (now - last > std::chrono::seconds(1)) {
            std::cout << "bytes joined: " << total << std::endl;
            last = now;
        }
    }
}
