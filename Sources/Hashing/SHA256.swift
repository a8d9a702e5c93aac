import CLibCrypto

/// SHA-256 through OpenSSL's libcrypto.
public enum SHA256 {
    /// Computes the 32-byte SHA-256 digest of `bytes`.
    public static func digest(_ bytes: [UInt8]) -> [UInt8] {
        bytes.withUnsafeBufferPointer { digest($0) }
    }

    /// Computes the 32-byte SHA-256 digest of the bytes in `buffer`.
    public static func digest(_ buffer: UnsafeBufferPointer<UInt8>) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        // EVP_Digest returns 1 on success; with a built-in digest such as SHA-256 it fails only
        // when memory allocation fails, which this code treats as fatal.
        let status = output.withUnsafeMutableBufferPointer { outputBuffer in
            EVP_Digest(buffer.baseAddress, buffer.count, outputBuffer.baseAddress, &length, EVP_sha256(), nil)
        }
        guard status == 1, length == 32 else {
            fatalError("EVP_Digest(SHA-256) failed")
        }
        output.removeLast(output.count - Int(length))
        return output
    }
}

extension Array where Element == UInt8 {
    /// Lowercase hexadecimal text of the bytes, two digits per byte.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var text = [UInt8]()
        text.reserveCapacity(count * 2)
        for byte in self {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}
